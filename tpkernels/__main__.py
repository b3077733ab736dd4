"""``python -m tpkernels [ISA ...]``: build (or find) the native CPU kernels; see `tpkernels.native.main`.

The entry point lives here, not in `tpkernels.native`, because importing the package imports
`native`: running that module as ``__main__`` would execute a second copy of it."""

import sys

from tpkernels import native

sys.exit(native.main())
