"""Thread and bf16 decisions: cgroup quotas, cpuinfo flags, the bf16 rule."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import hardware


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cgroup_v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def test_cgroup_v2_quota(tmp_path):
    assert hardware.cgroup_cpu_limit(_cgroup_v2(tmp_path, "max 100000\n")) is None
    assert hardware.cgroup_cpu_limit(_cgroup_v2(tmp_path, "400000 100000\n")) == 4
    assert hardware.cgroup_cpu_limit(_cgroup_v2(tmp_path, "150000 100000\n")) == 1  # rounded down
    assert hardware.cgroup_cpu_limit(_cgroup_v2(tmp_path, "20000 100000\n")) == 1  # at least one


def test_cgroup_v1_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert hardware.cgroup_cpu_limit(tmp_path) is None
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    assert hardware.cgroup_cpu_limit(tmp_path) == 3


def _membership(tmp_path, text):
    path = tmp_path / "proc_self_cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_quota_of_a_nested_cgroup_and_its_parents(tmp_path):
    root = tmp_path / "fs"
    job = root / "batch.slice" / "job-7"
    job.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    membership = _membership(tmp_path, "0::/batch.slice/job-7\n")
    assert hardware.cgroup_cpu_limit(root, membership) is None
    (job / "cpu.max").write_text("800000 100000\n")
    assert hardware.cgroup_cpu_limit(root, membership) == 8
    # A parent's quota binds its children: the tightest on the way up counts.
    (root / "batch.slice" / "cpu.max").write_text("300000 100000\n")
    assert hardware.cgroup_cpu_limit(root, membership) == 3
    (job / "cpu.max").write_text("200000 100000\n")
    assert hardware.cgroup_cpu_limit(root, membership) == 2
    # Another process's cgroup is not this one's.
    other = _membership(tmp_path, "0::/user.slice\n")
    assert hardware.cgroup_cpu_limit(root, other) is None


def test_cgroup_path_outside_the_mount_reads_the_mount_root(tmp_path):
    """A container without its own cgroup namespace sees the host's path for its cgroup, while
    /sys/fs/cgroup is its own cgroup: the quota is at the mount's root."""
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    membership = _membership(tmp_path, "0::/system.slice/docker-1234.scope\n")
    assert hardware.cgroup_cpu_limit(tmp_path, membership) == 1


def test_cgroup_v1_quota_of_a_nested_cgroup(tmp_path):
    base = tmp_path / "cpu,cpuacct"
    job = base / "slurm" / "job_12"
    job.mkdir(parents=True)
    for d, quota in ((base, "-1"), (base / "slurm", "-1"), (job, "400000")):
        (d / "cpu.cfs_period_us").write_text("100000\n")
        (d / "cpu.cfs_quota_us").write_text(quota + "\n")
    membership = _membership(tmp_path, "12:memory:/slurm/job_12\n4:cpu,cpuacct:/slurm/job_12\n0::/\n")
    assert hardware.cgroup_cpu_limit(tmp_path, membership) == 4
    unreadable = tmp_path / "missing"
    assert hardware.cgroup_cpu_limit(tmp_path, unreadable) is None  # the mount root alone: no quota


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert hardware.cgroup_cpu_limit(tmp_path) is None
    assert hardware.cpu_budget(tmp_path) == len(__import__("os").sched_getaffinity(0))


def test_threads_lowered_to_the_quota_never_raised(tmp_path, restore_threads):
    torch.set_num_threads(2)
    assert hardware.configure_threads(None, _cgroup_v2(tmp_path, "100000 100000")) == 1
    assert torch.get_num_threads() == 1
    # A quota above what torch uses leaves torch's choice alone.
    assert hardware.configure_threads(None, _cgroup_v2(tmp_path, "6400000 100000")) == 1
    # An explicit setting wins over the quota.
    assert hardware.configure_threads(2, _cgroup_v2(tmp_path, "100000 100000")) == 2


def test_cpuinfo_flags():
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
    x86_without = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\nCPU part\t: 0xd40\n"
    arm_without = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"
    assert hardware.cpuinfo_declares_bf16(x86)
    assert not hardware.cpuinfo_declares_bf16(x86_without)
    assert hardware.cpuinfo_declares_bf16(arm)
    assert not hardware.cpuinfo_declares_bf16(arm_without)
    # The word must be a flag of its own, not part of another one or of another field.
    assert not hardware.cpuinfo_declares_bf16("flags\t: avx512_bf16x\nmodel name\t: avx512_bf16 chip\n")


def test_bf16_rule():
    assert not hardware.decide_bf16(False, 400.0, 100.0).use  # no native bf16: never
    fast = hardware.decide_bf16(True, 420.0, 183.0)
    assert fast.use and "2.30x" in fast.reason
    slow = hardware.decide_bf16(True, 110.0, 100.0)
    assert not slow.use and "1.10x" in slow.reason and "1.25x" in slow.reason
    assert hardware.decide_bf16(True).use  # a GPU: declared support is enough


def test_settings_on_and_off_skip_the_probe(monkeypatch):
    def boom(device_type=None):
        raise AssertionError("probed")

    monkeypatch.setattr(hardware, "bf16_choice", boom)
    assert hardware.use_bf16("on") is True
    assert hardware.use_bf16("off") is False
    with pytest.raises(AssertionError):
        hardware.use_bf16("auto")


def test_auto_follows_the_measured_choice(monkeypatch):
    monkeypatch.setattr(hardware, "bf16_choice", lambda device_type=None: hardware.decide_bf16(True, 110.0, 100.0))
    assert hardware.use_bf16("auto") is False
    monkeypatch.setattr(hardware, "bf16_choice", lambda device_type=None: hardware.decide_bf16(True, 300.0, 100.0))
    assert hardware.use_bf16("auto") is True


@pytest.fixture
def fresh_bf16_choice():
    hardware._bf16_choice.cache_clear()
    yield
    hardware._bf16_choice.cache_clear()


def test_a_cpu_engine_on_a_gpu_machine_is_decided_by_the_cpu(monkeypatch, fresh_bf16_choice):
    """A bf16 GPU must not turn bf16 on for a model that runs on a CPU whose bf16 is slow."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(hardware, "bf16_native", lambda device_type=None: True)
    speeds = {torch.bfloat16: [110.0] * 5, torch.float32: [100.0] * 5}
    monkeypatch.setattr(hardware, "matmul_gflops", lambda dtype, size, repeats: speeds[dtype])
    assert hardware.default_device_type() == "cuda"
    assert hardware.use_bf16("auto") is True  # the GPU: declared support, not probed
    cpu = hardware.bf16_choice("cpu")
    assert not cpu.use and cpu.bf16_gflops == 110.0 and "1.10x" in cpu.reason
    assert hardware.use_bf16("auto", "cpu") is False


def test_engine_bf16_is_decided_by_the_engines_device(monkeypatch, fresh_bf16_choice):
    """A bf16 GPU beside a CPU without native bf16: the engine's device decides, per device."""
    from harness import stages
    from harness.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(hardware, "cpuinfo_declares_bf16", lambda text: False)
    assert stages.engine_bf16(load_config(None, ["engine.device=cpu"])) is False
    assert stages.engine_bf16(load_config(None, ["engine.device=cuda:1"])) is True
    assert stages.engine_bf16(load_config(None, ["engine.device=cpu", "engine.bf16=on"])) is True


def test_this_machines_choice_is_consistent():
    choice = hardware.bf16_choice()
    if not hardware.bf16_native():
        assert not choice.use and choice.bf16_gflops is None
    elif not torch.cuda.is_available():
        assert choice.bf16_gflops > 0 and choice.fp32_gflops > 0
        assert choice.use == (choice.bf16_gflops / choice.fp32_gflops >= hardware.BF16_MIN_SPEEDUP)
    json.dumps(choice.as_dict())


def test_meminfo_available():
    text = "MemTotal:       24634456 kB\nMemFree:         1000000 kB\nMemAvailable:   20971520 kB\n"
    assert hardware.meminfo_available(text) == 20 * 2**30
    assert hardware.meminfo_available("MemTotal: 1 kB\n") is None


def test_kv_cache_budget(monkeypatch):
    cpu = torch.device("cpu")
    assert hardware.kv_cache_budget_gib(3.5, cpu) == 3.5
    assert hardware.kv_cache_budget_gib(None, cpu) is None
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda device: 12 * 2**30)
    assert hardware.kv_cache_budget_gib("auto", cpu) == 12 * hardware.KV_CACHE_SHARE
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda device: None)
    assert hardware.kv_cache_budget_gib("auto", cpu) == hardware.KV_CACHE_FALLBACK_GIB


def test_free_memory_reads_the_gpu_for_a_cuda_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (30 * 2**30, 80 * 2**30))
    # torch's allocator holds 6 GiB, 4 of them in live tensors: 2 GiB more are free to the engine.
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * 2**30)
    assert hardware.free_memory_bytes(torch.device("cuda:1")) == 32 * 2**30
    assert asked == [torch.device("cuda:1")]


def test_this_hosts_free_memory_is_read():
    free = hardware.free_memory_bytes(torch.device("cpu"))
    if __import__("os").path.exists("/proc/meminfo"):
        assert free is not None and free > 0
