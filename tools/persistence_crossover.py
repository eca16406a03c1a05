"""Where does per-sequence persistence stop winning? TPOT of the persistent decode loop vs the
CUDA-graph loop over batch sizes, at each tier's model shape.

    python -m tools.persistence_crossover [--batches 1 4 8 16 32 64] [--steps 32]
"""

import argparse

import torch

from kernels import decode_graphs, decode_loop, tiny_decoder
from suite.loop_cases import TIERS, bind, check_loop, make_loop_inputs
from suite.timing import measure
from tools._args import positive_int, require_cuda


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--steps", type=positive_int, default=32)
    args = parser.parse_args()
    require_cuda(parser, "persistence_crossover")
    decoders = {"graphs": lambda *a, **kw: decode_graphs.graph_decode(*a, mode="full", **kw),
                "persistent": decode_loop.triton_persistent}
    print("tier (model)                       batch  graphs TPOT us  persistent TPOT us  persistent/graphs speedup")
    for name, tier in TIERS.items():
        weights = tiny_decoder.random_weights(tier.q_heads, tier.kv_heads, tier.head_dim, torch.bfloat16, "cuda")
        for batch in args.batches:
            prompt_lens = [tier.prompt] * batch
            tpot = {}
            for variant, decode in decoders.items():
                inputs = make_loop_inputs(weights, prompt_lens, args.steps, "cuda")
                launch = bind(decode, weights, inputs, args.steps)
                inputs.poison()
                check_loop(launch(), weights, inputs, args.steps)  # timed only once it is right
                tpot[variant] = measure(launch, device="cuda", rounds=10, before=inputs.reset) / args.steps
            model = f"d_model {weights.d_model}, Hkv {tier.kv_heads}, D {tier.head_dim}, P {tier.prompt}"
            print(f"{name:6s} ({model:34s}) {batch:5d}  {tpot['graphs'] * 1e6:14.1f}  "
                  f"{tpot['persistent'] * 1e6:18.1f}  {tpot['graphs'] / tpot['persistent']:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
