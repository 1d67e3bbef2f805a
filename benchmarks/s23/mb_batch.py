import sys, time, torch
from pathlib import Path
from llm_prune.blocks import build_skeleton, load_block, capture_block_inputs, matmul_autocast
from llm_prune.reader import CheckpointReader
from llm_prune.arch import arch_for
torch.set_num_threads(2)
src = Path.home()/".cache/llm-prune/models/smollm2-135m"
reader = CheckpointReader(src)
arch = arch_for(reader.config)
sk = build_skeleton(src)
blocks = sk.get_submodule(arch.blocks_attr)
N, S = 32, 512
windows = torch.randint(0, 49000, (N, S))
mode = sys.argv[1]
dtype = torch.float32
matmul = torch.bfloat16 if mode == "bf16" else None
x, kw = capture_block_inputs(sk, reader, arch, blocks[0], windows, "cpu", dtype, "cpu")
names = [n for n in reader.infos if n.startswith("model.layers.3.")]
tensors = reader.read(names)
block = load_block(blocks[3], tensors, arch, "cpu", dtype, matmul)
with torch.no_grad(), matmul_autocast("cpu", matmul):
    for B in [1, 2, 4, 8, 1, 4, 8]:
        t0 = time.perf_counter()
        for j in range(0, N, B):
            y = block(x[j:j+B], **kw)
        dt = time.perf_counter() - t0
        print(mode, B, f"{dt:.3f}s for {N} samples")
