"""Example task modules for taskgate's local quick start (`deploy/local/run.sh`)."""
