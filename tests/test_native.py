"""The native-library settings: an I/O thread gets one OpenMP thread without touching the compute thread's."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sct_edge.engine.process import _openmp_runtime, single_openmp_thread


def test_single_openmp_thread_is_the_calling_threads_alone():
    if _openmp_runtime() is None:
        pytest.skip("no OpenMP runtime found in this process's memory map")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with ThreadPoolExecutor(1, initializer=single_openmp_thread) as io_thread:
            assert io_thread.submit(torch.get_num_threads).result() == 1
            assert torch.get_num_threads() == 2  # torch.set_num_threads(1) there would have made this 1
            assert io_thread.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(previous)

