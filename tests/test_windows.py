"""The windows' agreement between ranks (jax_ep.backends.cuda.exchange_windows):
every rank takes part, and the windows are on only where every rank mapped every
other. The ranks are threads over an in-memory key-value store whose reads wait,
as the job's store does."""

import threading

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


def _run(size, export_of, import_of):
    kv, out = KV(), [None] * size

    def rank(r):
        out[r] = cuda_backend.exchange_windows(kv, r, size, export_of(r), import_of(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting"
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
