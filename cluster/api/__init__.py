"""Generated gRPC stubs for the tpserve.v1 API (proto/tpserve/v1/tpserve.proto).

Do not edit these files: regenerate them with ``python -m cluster.protogen``.
"""
