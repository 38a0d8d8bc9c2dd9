"""One torch thread per test process: the suite runs as two xdist workers on two cores, and
torch's default (a thread per core in every process) oversubscribes them, 20-50× slower
whenever anything else is running. Subprocesses the tests start inherit the setting."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
