"""The agreements between the processes of a group: the windows'
(jax_ep.backends.cuda.exchange_windows: every rank takes part, and the windows are
on only where every rank mapped every other) and the Buffer's memory
(_connect_processes: VMM allocations, replaced by cudaMalloc memory on every rank
when any rank cannot map another's). The ranks are threads over an in-memory
key-value store whose reads wait, as the job's store does."""

import threading
import types

import pytest

from jax_ep.backends import cuda as cuda_backend


class KV:
    def __init__(self):
        self.data = {}
        self.cv = threading.Condition()

    def set(self, key, value):
        with self.cv:
            self.data[key] = bytes(value)
            self.cv.notify_all()

    def get(self, key):
        with self.cv:
            assert self.cv.wait_for(lambda: key in self.data, timeout=20), f"nobody set {key}"
            return self.data[key]


def _ranks(size, body):
    """body(r) on `size` threads at once; fails if any still waits after 30 s."""
    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting"


def _run(size, export_of, import_of):
    kv, out = KV(), [None] * size

    def rank(r):
        out[r] = cuda_backend.exchange_windows(kv, r, size, export_of(r), import_of(r))

    _ranks(size, rank)
    return out


def test_every_rank_maps_every_other_in_rank_order():
    seen = {}

    def importer(r):
        def f(recs):
            seen[r] = list(recs)
            return True, ""
        return f

    out = _run(4, lambda r: (lambda: f"record {r}".encode()), importer)
    assert out == [(True, "")] * 4
    assert all(seen[r] == [f"record {q}".encode() for q in range(4)] for r in range(4))


def test_a_rank_without_windows_turns_them_off_everywhere():
    imported = []
    out = _run(3, lambda r: None if r == 1 else (lambda: b"x"),
               lambda r: (lambda recs: (imported.append(r), (True, ""))[1]))
    assert [on for on, _ in out] == [False] * 3
    assert imported == []  # nobody maps anything
    assert "rank 1" in out[0][1]


def test_a_rank_that_cannot_share_its_memory():
    out = _run(3, lambda r: (lambda: b"" if r == 2 else b"x"), lambda r: (lambda recs: (True, "")))
    assert [on for on, _ in out] == [False] * 3 and all("rank 2" in why for _, why in out)


def test_one_failed_mapping_turns_them_off_everywhere():
    out = _run(3, lambda r: (lambda: b"x"), lambda r: (lambda recs: (r != 2, "no pidfd" if r == 2 else "")))
    assert [on for on, _ in out] == [False] * 3
    assert out[2][1] == "no pidfd"
    assert "rank 2 could not map" in out[0][1]


def test_a_rank_that_raises_still_takes_part():
    def export_of(r):
        def f():
            if r == 0:
                raise RuntimeError("no VMM here")
            return b"x"
        return f

    out = _run(3, export_of, lambda r: (lambda recs: (True, "")))
    assert [on for on, _ in out] == [False] * 3
    assert "no VMM here" in out[0][1] and "rank 0" in out[1][1]

    def import_of(r):
        def f(recs):
            if r == 1:
                raise OSError("EPERM")
            return True, ""
        return f

    out = _run(3, lambda r: (lambda: b"x"), import_of)
    assert [on for on, _ in out] == [False] * 3 and "EPERM" in out[1][1]


def test_windows_wanted_only_with_a_pool_made_at_start(monkeypatch):
    for name in ("JAX_EP_WINDOWS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    assert cuda_backend._windows_wanted()
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert not cuda_backend._windows_wanted()
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    assert not cuda_backend._windows_wanted()
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
    monkeypatch.setenv("JAX_EP_WINDOWS", "0")
    assert not cuda_backend._windows_wanted()


class FakeExt:
    """The extension's create / ipc_handle / connect / close, recorded per rank
    (device r is rank r). Failures to inject: `no_vmm_import` ranks cannot map a
    VMM handle (pidfd_getfd refused, RuntimeError); `fail_create` holds (rank,
    kind) pairs whose create raises; `fail_handle` ranks whose ipc_handle raises;
    `connect_error` the exception type connect raises."""

    def __init__(self, no_vmm_import=(), fail_create=(), fail_handle=(), connect_error=RuntimeError):
        self.no_vmm_import = set(no_vmm_import)
        self.fail_create = set(fail_create)
        self.fail_handle = set(fail_handle)
        self.connect_error = connect_error
        self.lock = threading.Lock()
        self.kind = {}
        self.log = []

    def _rec(self, *what):
        with self.lock:
            self.log.append(what)

    def create(self, buffer_id, dev, rank, n, *args, vmm=False):
        kind = "vmm" if vmm else "ipc"
        self._rec("create", dev, kind)
        if (dev, kind) in self.fail_create:
            raise RuntimeError(f"jax_ep: cuMemCreate of the Buffer failed on {dev}")
        self.kind[dev] = kind

    def ipc_handle(self, buffer_id, dev):
        if dev in self.fail_handle and self.kind[dev] == "vmm":
            raise RuntimeError("jax_ep: exporting the Buffer's VMM allocation failed")
        return f"{self.kind[dev]}:{dev}|x".encode()  # a raw handle may hold "|"

    def connect(self, buffer_id, dev, handles, local_devs):
        self._rec("connect", dev, tuple(handles))
        if dev in self.no_vmm_import and any(h.startswith(b"vmm") for h in handles):
            raise self.connect_error(f"jax_ep: pidfd_getfd of rank {(dev + 1) % len(handles)}'s process failed")

    def close_export(self, buffer_id, dev):
        self._rec("close_export", dev)

    def close(self, buffer_id, dev):
        self._rec("close", dev)


def _connect_group(monkeypatch, size, ext, vmm=True, config=lambda r: b"cfg"):
    """Every rank (a thread, device r) runs _connect_processes (`vmm`: a bool, or
    one per rank); (its warnings, {rank: exception})."""
    monkeypatch.setattr(cuda_backend, "_ext", ext)
    warned = []
    monkeypatch.setattr(cuda_backend.warnings, "warn", lambda msg, *a, **k: warned.append(msg))
    kv, errors = KV(), {}
    buf = types.SimpleNamespace(buffer_id=7, name="b", num_ranks=size)
    devs = [types.SimpleNamespace(local_hardware_id=r) for r in range(size)]
    wants = vmm if isinstance(vmm, (list, tuple)) else [vmm] * size

    def rank(r):
        def create(d, v):
            ext.create(7, d.local_hardware_id, r, size, v, vmm=v)
        try:
            cuda_backend._connect_processes(buf, kv, devs, [devs[r]], [-1] * size, config(r), create, wants[r])
        except Exception as e:  # noqa: BLE001
            errors[r] = e

    _ranks(size, rank)
    return warned, errors


def _events(ext, dev):
    return [e[:3] if e[0] == "create" else e[:2] for e in ext.log if e[1] == dev]


def _connects(ext, dev):
    return [e[2] for e in ext.log if e[0] == "connect" and e[1] == dev]


def test_buffer_memory_vmm_everywhere(monkeypatch):
    ext = FakeExt()
    assert _connect_group(monkeypatch, 4, ext) == ([], {})
    for r in range(4):
        assert _events(ext, r) == [("create", r, "vmm"), ("connect", r), ("close_export", r)]
        want = tuple(b"" if q == r else f"vmm:{q}|x".encode() for q in range(4))
        assert _connects(ext, r) == [want]  # every other rank's handle, in rank order


def test_buffer_memory_falls_back_on_every_rank(monkeypatch):
    ext = FakeExt(no_vmm_import={2})
    warned, errors = _connect_group(monkeypatch, 3, ext)
    assert errors == {}
    for r in range(3):
        assert _events(ext, r) == [("create", r, "vmm"), ("connect", r), ("close", r),
                                   ("create", r, "ipc"), ("connect", r)]
        assert all(h == b"" or h.startswith(b"ipc") for h in _connects(ext, r)[-1])
    assert len(warned) == 1 and "CUDA IPC" in warned[0] and "pidfd_getfd" in warned[0]


@pytest.mark.parametrize("failure", [dict(fail_create={(1, "vmm")}), dict(fail_handle={1}),
                                     dict(no_vmm_import={1}, connect_error=ValueError)])
def test_buffer_memory_any_failure_falls_back(monkeypatch, failure):
    """A rank whose VMM memory cannot be made, exported or mapped (whatever it
    raises) still takes part: every rank ends on cudaMalloc memory."""
    ext = FakeExt(**failure)
    warned, errors = _connect_group(monkeypatch, 3, ext)
    assert errors == {}
    for r in range(3):
        assert [e for e in _events(ext, r) if e[0] == "create"][-1] == ("create", r, "ipc")
        assert all(h == b"" or h.startswith(b"ipc") for h in _connects(ext, r)[-1])
        assert ("close", r) in _events(ext, r)
    assert len(warned) == 1 and "rank 1" in warned[0]


def test_buffer_memory_vmm_only_if_every_process_asks(monkeypatch):
    ext = FakeExt()
    assert _connect_group(monkeypatch, 3, ext, vmm=[True, False, True]) == ([], {})
    for r in range(3):
        assert _events(ext, r) == [("create", r, "ipc"), ("connect", r)]


def test_buffer_memory_without_vmm(monkeypatch):
    ext = FakeExt()
    assert _connect_group(monkeypatch, 2, ext, vmm=False) == ([], {})
    assert all(_events(ext, r) == [("create", r, "ipc"), ("connect", r)] for r in range(2))


def test_buffer_memory_a_failed_cudamalloc_round_raises_everywhere(monkeypatch):
    ext = FakeExt(fail_create={(0, "vmm"), (0, "ipc")})
    warned, errors = _connect_group(monkeypatch, 3, ext)
    assert sorted(errors) == [0, 1, 2]
    assert all(isinstance(e, RuntimeError) and "cuMemCreate" in str(e) for e in errors.values())


def test_buffer_memory_refuses_another_configuration(monkeypatch):
    ext = FakeExt()
    warned, errors = _connect_group(monkeypatch, 3, ext, config=lambda r: b"other" if r == 2 else b"cfg")
    assert sorted(errors) == [0, 1, 2]
    assert all(isinstance(e, ValueError) for e in errors.values())
    assert "rank 2" in str(errors[0]) and "rank 0" in str(errors[2])
    assert not any(e[0] == "connect" for e in ext.log)


def test_buffer_vmm_wanted(monkeypatch):
    monkeypatch.delenv("JAX_EP_BUFFER_VMM", raising=False)
    assert cuda_backend._buffer_vmm_wanted()
    monkeypatch.setenv("JAX_EP_BUFFER_VMM", "0")
    assert not cuda_backend._buffer_vmm_wanted()
