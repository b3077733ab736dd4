"""Generated stubs of the KServe v2 gRPC service as Triton publishes it (proto/inference/).

Built into POOL, a descriptor pool of their own: Triton's client registers the same file names
in protobuf's default pool. Do not edit: regenerate with ``python -m cluster.protogen``.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
