// The namespace our operators are registered under. The build that serves uses "tpserve"; the
// builds for other instruction sets (tests, TPSERVE_NATIVE_ISA) are compiled with their own
// -DTPSERVE_NS so that several of them can be loaded into one process (tpkernels/native.py).
#pragma once

#include <torch/library.h>

#ifndef TPSERVE_NS
#define TPSERVE_NS tpserve
#endif

// torch's macros paste their namespace argument as written; these expand TPSERVE_NS first.
#define TPSERVE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define TPSERVE_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TPSERVE_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)
