"""torchrun worker for tests/test_train_tp.py: a TP model cut from the dense model gives the
dense loss and, for every parameter, the dense gradient (sliced ones: this rank's slice), with
documents packed; gathering the shards gives back the dense weights. An optional second argument
(JSON) sets more model fields, e.g. the DA-layer variants of tests/test_variants.py."""

import json
import sys

import torch
import torch.distributed as dist

from fluidlm.model import FluidLM
from fluidlm.model.config import ModelConfig
from fluidlm.parallel.tensor import TensorParallelLayers, gather_state_dict, shard_state_dict, sliced_parameters
from fluidlm.parallel.topology import Layout, init_model_parallel


def main(direction: str, extra: dict | None = None) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    layout = Layout.from_world(dist.get_world_size(), tp=dist.get_world_size())
    init_model_parallel(layout)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, head_dim=8, chunk_size=8, max_seq_len=128,
                      direction=direction, **(extra or {}))
    torch.manual_seed(0)
    dense = FluidLM(cfg).double()
    with torch.no_grad():  # variants' per-head parameters away from their identity init: slicing must matter
        for name, p in dense.named_parameters():
            if name.endswith(("qkv_conv_weight", "out_norm.weight")):
                p.normal_()
    layers = TensorParallelLayers()
    tp = FluidLM(cfg, layers).double()
    tp.load_state_dict(shard_state_dict(dense.state_dict(), tp, layers.tp_rank, layers.tp_size), strict=False)
    tokens, targets = torch.randint(0, 64, (1, 40)), torch.randint(0, 64, (1, 40))
    targets[0, 5] = -100
    cu = torch.tensor([0, 13, 40])
    ref = dense.loss(tokens, targets, cu, chunk_tokens=16)
    ref.backward()
    got = tp.loss(tokens, targets, cu, chunk_tokens=16)
    got.backward()
    assert abs(ref.item() - got.item()) < 1e-5, (ref.item(), got.item())  # logits are fp32 in the loss
    sliced = sliced_parameters(tp)
    assert {n for n in sliced if n.endswith("rho")} == {"blocks.0.attn.rho", "blocks.1.attn.rho"}
    dense_grads = dict(dense.named_parameters())
    for name, p in tp.named_parameters():
        want = dense_grads[name].grad
        if name in sliced:
            want = want.chunk(layout.tp, dim=sliced[name])[layers.tp_rank]
        err = (p.grad - want).abs().max().item()
        assert err < 1e-6, (name, err)
    full = gather_state_dict(tp, layers.group)
    assert all(torch.equal(full[k], v) for k, v in dense.state_dict().items())
    if dist.get_rank() == 0:
        print(f"OK {direction}: loss {got.item():.6f}, {len(sliced)} sliced parameters")
        if extra:
            print("sliced:", ", ".join(sorted({n.split(".", 3)[-1] for n in sliced})))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else None)
