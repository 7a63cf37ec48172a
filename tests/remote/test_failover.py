"""Replicas of a layer range: a shard killed mid-generation, or one that never answers (timeout), is
replaced by its replica and the output stays identical to local generation; with no replica left the
error names the shard and the layer."""

from __future__ import annotations

import socket
import threading

import pytest

from modelql.errors import RemoteError
from modelql.remote.client import load_remote_model
from modelql.runtime.generate import stream
from modelql.runtime.sampling import SamplingParams

from .conftest import PROMPT, shard_process

PARAMS = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)


def test_killing_a_replica_mid_generation_keeps_the_output(local_tokens):
    with shard_process("--layers", "0-1") as (low, low_url), shard_process("--layers", "0-1") as (low2, low2_url), \
            shard_process("--layers", "2-3") as (_, high_url):
        model = load_remote_model(None, f"{low_url},{low2_url},{high_url}")
        try:
            out = []
            for i, d in enumerate(stream(model, PROMPT, PARAMS)):
                out.append(d.token_id)
                if i == 10:
                    low.kill()  # the replica in use for layers 0-1 dies mid-generation
                    low.wait()
            assert out == local_tokens
            assert model.ffn.stats.failovers == 1
            assert model.ffn.shards[0].url == low_url and model.ffn.shards[0].last_error  # refused or reset
            # the survivor dies too: the error names the shards tried and the layer
            low2.kill()
            low2.wait()
            with pytest.raises(RemoteError) as err:
                model.forward([1, 2, 3])
            msg = str(err.value)
            assert "FFN of layer 0 failed on every shard that owns it" in msg
            assert low_url in msg and low2_url in msg
        finally:
            model.ffn.close()


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers (a hung shard)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_a_timed_out_shard_fails_over_to_its_replica(local_tokens):
    silent = SilentServer()
    try:
        with shard_process() as (_, good):
            model = load_remote_model(None, f"0-3={silent.url},0-3={good}", timeout=1.0)
            try:
                out = [d.token_id for d in stream(model, PROMPT, PARAMS.replace(max_tokens=20))]
                assert out == local_tokens[:20]
                st = model.ffn.stats
                assert st.failovers == 1  # marked down after one timeout; later requests go straight to good
                assert "timed out" in model.ffn.shards[0].last_error
            finally:
                model.ffn.close()
    finally:
        silent.close()
