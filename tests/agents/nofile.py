"""Prints its RLIMIT_NOFILE as "nofile <soft> <hard>" and exits 0."""

import resource

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
print(f"nofile {soft} {hard}", flush=True)
