"""Process-wide settings: made by `configure_process` at an entry point only, restorable, and an I/O thread
gets one OpenMP thread without touching the compute thread's."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from sct_edge.engine.plan import make_plan
from sct_edge.engine.process import (
    GLIBC_MALLOC,
    STEP_MALLOC,
    ProcessSettings,
    _openmp_runtime,
    configure_process,
    current_process_settings,
    restore_process,
    signals_handled_by,
    single_openmp_thread,
)
from sct_edge.engine.profile import load_profile
from sct_edge.engine.step import Engine
from sct_edge.model import products
from sct_edge.model.config import get_preset
from sct_edge.store.store import Store
from sct_edge.train.trainer import inference_engine


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


@pytest.mark.parametrize("given, seen", [(None, "100000"), ("5", "5")])
def test_the_command_sets_openmp_spinning_before_torch_loads_unless_the_user_has(given, seen):
    # libgomp reads GOMP_SPINCOUNT when torch loads; a command imports torch only once `main` has set it.
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    code = ("import os, sys; from sct_edge import cli; loaded = 'torch' in sys.modules; cli.main(['presets']);"
            "print(loaded, 'torch' in sys.modules, os.environ['GOMP_SPINCOUNT'], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.split() == ["False", "True", seen]


def test_an_engine_and_an_inference_engine_leave_the_process_settings_alone(tmp_path):
    torch.set_num_threads(1)
    before = current_process_settings()
    with Store.create(tmp_path / "store", get_preset("tiny")) as store:
        plan = make_plan(store.config, load_profile("ci"), 2, 16, 1, "lm")
        Engine(store, plan).close()
        inference_engine(store, "ci", None, 16).close()
    assert current_process_settings() == before


def test_configure_process_sets_threads_malloc_and_products_and_the_fixture_can_put_them_back():
    before = current_process_settings()
    assert before.onednn == products.onednn_available()  # oneDNN's products wherever it has AVX-512
    settings = ProcessSettings.for_profile(load_profile("ci"), threads=1)
    assert settings == ProcessSettings(threads=1, malloc=STEP_MALLOC)  # the route stays the process's
    settings = replace(settings, onednn=False)
    configure_process(settings)
    assert current_process_settings() == settings and torch.get_num_threads() == 1
    assert not products.uses_onednn()
    restore_process(before)
    assert torch.get_num_threads() == before.threads
    assert current_process_settings().malloc in (before.malloc, GLIBC_MALLOC)
    assert products.uses_onednn() == before.onednn


def test_the_profile_decides_the_threads_capped_at_the_usable_cores():
    profile = load_profile("ci")
    assert ProcessSettings.for_profile(profile).threads == profile.usable_threads()


def test_signal_handlers_are_restored_after_the_block():
    calls = []
    previous = signal.getsignal(signal.SIGTERM)
    with signals_handled_by(lambda: calls.append("stop"), (signal.SIGTERM,)):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread between bytecodes
    assert calls == ["stop"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_paging_plans_trim_the_heap_and_resident_plans_do_not():
    config = get_preset("tiny")
    resident = make_plan(config, load_profile("ci"), 2, 16, 1, "lm")
    paged = make_plan(config, load_profile("ci", "324MiB"), 2, 16, 1, "lm")
    assert not resident.pages_blocks and paged.pages_blocks
