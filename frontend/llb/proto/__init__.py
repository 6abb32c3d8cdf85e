"""Generated protobuf modules of the .proto files here (compiled by setup.py; never edited)."""
