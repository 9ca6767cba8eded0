"""Where one family's sweep time goes: runs ``scaler_wizard.sweep.worker`` for one family in this
process (imports timed apart) and sums the wall time of each phase -- discovery (``discover``), each
torch.export, the size-constant traces, ``check``, verification's IR check (the grown model's
re-trace), the logit comparison, the tiny build, compile, execute, reload -- with call counts, and how
many exports were of a config already exported (a repeated trace). Phases nest (export is inside
discover, which is inside check / ir_check): the figures are not additive.

    SCALER_WIZARD_CACHE=$(mktemp -d) .venv/bin/python benchmarks/sweep_profile.py llama [ops,...]

Use an empty cache to see the first-trace cost a sweep pays.
"""
import sys, time, json, collections, hashlib
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
T0=time.time()
import torch
from scaler_wizard import sweep, api
import scaler_wizard.ir as irm
import scaler_wizard.ir.trace as tr
import scaler_wizard.ir.discovery.constants as cst
import scaler_wizard.ir.discovery.build as bld
import scaler_wizard.runtime.verify as rv
acc=collections.defaultdict(float); cnt=collections.Counter()
def wrap(mod, name, label):
    f=getattr(mod,name)
    def w(*a,**k):
        t=time.time()
        try: return f(*a,**k)
        finally: acc[label]+=time.time()-t; cnt[label]+=1
    setattr(mod,name,w)
print("imports %.2f"%(time.time()-T0))
cfgs=[]
orig_export=tr.export_model
def exp(model,*a,**k):
    cfgs.append(hashlib.md5(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:8])
    return orig_export(model,*a,**k)
tr.export_model=exp
wrap(tr,"export_model","export")
wrap(tr,"build_meta_model","meta_build")
wrap(cst,"size_dependent_constants","constants(total)")
bld.size_dependent_constants=cst.size_dependent_constants
wrap(irm,"discover","discover")
wrap(api,"check","check")
wrap(api,"_ir_check","ir_check")
wrap(rv,"compare_models","compare_models")
wrap(sweep,"build_tiny","build_tiny")
wrap(api,"compile","compile")
import scaler_wizard.runtime.execute as ex
wrap(ex,"execute","execute")
from transformers import AutoModelForCausalLM
fp=AutoModelForCausalLM.from_pretrained
def fpw(*a,**k):
    t=time.time(); r=fp(*a,**k); acc["from_pretrained"]+=time.time()-t; cnt["from_pretrained"]+=1; return r
AutoModelForCausalLM.from_pretrained=fpw
class S:
    def write(self,s):
        if s.strip():
            d=json.loads(s); print("  ",d.get("event"), d.get("op") or "", d.get("cell") or "", d.get("seconds"), flush=True)
    def flush(self): pass
fam=sys.argv[1]
ops=sys.argv[2].split(",") if len(sys.argv)>2 else list(sweep.OPS)
t=time.time()
sweep.worker(fam, ops, S())
print("worker %.2f"%(time.time()-t))
for k,v in sorted(acc.items(), key=lambda kv:-kv[1]): print("  %-18s %7.2f s  x%d"%(k,v,cnt[k]))
print("export configs", len(cfgs), "distinct", len(set(cfgs)), collections.Counter(cfgs).most_common(3))
