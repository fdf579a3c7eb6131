"""CUDA tensors through the queue (run on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_put_is_stored_on_host_and_get_places_on_device(client, pid) -> None:
    data = TensorDict(
        {
            "ids": torch.arange(12, device="cuda").reshape(4, 3),
            "logp": torch.randn(4, 5, device="cuda", dtype=torch.bfloat16),
            "resp": torch.nested.nested_tensor(
                [torch.arange(n, device="cuda") for n in (1, 3, 2, 4)], layout=torch.jagged
            ),
        },
        batch_size=[4],
    )
    meta = client.put(data, partition_id=pid)
    on_host = client.get_data(meta)
    assert on_host["ids"].device.type == "cpu"
    assert torch.equal(on_host["ids"], data["ids"].cpu())
    on_gpu = client.get_data(meta, device="cuda")
    assert on_gpu["ids"].device.type == "cuda" and on_gpu["logp"].device.type == "cuda"
    assert torch.equal(on_gpu["logp"], data["logp"])
    assert [t.tolist() for t in on_gpu["resp"].unbind()] == [list(range(n)) for n in (1, 3, 2, 4)]


def test_cuda_write_back_into_rows_a_stage_consumed(client, pid) -> None:
    client.put({"prompt": torch.arange(4)}, partition_id=pid)
    meta = client.get_meta(["prompt"], 4, pid, "logprob")
    client.put({"old_logp": torch.ones(4, 2, device="cuda") * 0.5}, metadata=meta)
    got = client.get_data(client.get_meta(["prompt", "old_logp"], 4, pid, "train"), device="cuda")
    assert torch.equal(got["old_logp"], torch.full((4, 2), 0.5, device="cuda"))
