"""Generated protobuf and gRPC modules (private; regenerate with `make proto`)."""
