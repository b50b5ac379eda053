"""What runs on the hosts, shipped as source and run with the standard library only: the agent, the rank wrapper, the environment builder, the ONNX worker."""
