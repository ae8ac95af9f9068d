"""Generated from proto/grpc_predict_v2.proto by scripts/gen_proto.py. Never edit by hand."""
