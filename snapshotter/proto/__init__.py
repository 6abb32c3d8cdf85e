"""containerd's snapshots API subset (generated code is built from the .proto files here)."""
