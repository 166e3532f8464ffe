"""common/runtime.py: the allocator settings of a training process."""
import subprocess
import sys

from conftest import ROOT

# A training step's pattern: blocks of a few MiB allocated, written and freed, again and again (fresh process).
ALLOCATE_AND_FREE = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
from common.runtime import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(20):
    blocks = [torch.ones(size << 18) for size in (3, 5, 8, 13, 21, 30)]  # 3-30 MiB of float32, written
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(keep):
    proc = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE.format(root=ROOT, keep=keep)], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout.split()[-1])


def test_keep_freed_memory_serves_later_steps_without_new_pages():
    # 20 steps of 80 MiB: freshly mapped each time, that is about 20 x 20,000 pages; kept, about one step's worth
    default, kept = page_faults(False), page_faults(True)
    assert default > 200_000
    assert kept < default / 4
