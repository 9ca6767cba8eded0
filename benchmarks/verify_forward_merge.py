"""Two TinyLlama-shaped decoder layers (hidden 2048, ffn 5632, 32 heads, 4 kv heads): the random ids'
forward (2 x 32, with the cache) plus a separate padded batch (2 x 16), against one forward of the random rows
and the padded rows (2 x 32) together, as verification runs them since session 8. Alternating order, 12 rounds,
min and median printed. Usage: .venv/bin/python benchmarks/verify_forward_merge.py THREADS (README: 1 thread,
0.586 vs 0.636 s min)."""
import time
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM
torch.set_num_threads(int(__import__('sys').argv[1]))
cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, vocab_size=512)
m = LlamaForCausalLM(cfg).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 512, (2, 32), generator=g)
def padded(w, L):
    i = torch.randint(0, 512, (2, w)); mk = torch.ones(2, w, dtype=torch.long); mk[0, L:] = 0; mk[1, :w-L] = 0
    pos = (mk.cumsum(-1)-1).clamp(min=0); return i, mk, pos
pi16, pm16, pp16 = padded(16, 12)
pi32, pm32, pp32 = padded(32, 24)
allids = torch.cat([ids, pi32]); allm = torch.cat([torch.ones_like(ids), pm32]); allp = torch.cat([torch.arange(32).expand(2,32), pp32])
def apart():
    m(input_ids=ids, use_cache=True); m(input_ids=pi16, attention_mask=pm16, position_ids=pp16, use_cache=False)
def merged():
    m(input_ids=allids, attention_mask=allm, position_ids=allp, use_cache=True)
res = {"apart": [], "merged": []}
with torch.no_grad():
    for f in (apart, merged): f()
    for r in range(12):
        for name, f in (("apart", apart), ("merged", merged)) if r % 2 else (("merged", merged), ("apart", apart)):
            t = time.perf_counter(); f(); res[name].append(time.perf_counter() - t)
for k, v in res.items():
    v.sort(); print(k, "min %.4f median %.4f" % (v[0], v[len(v)//2]))
