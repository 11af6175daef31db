# In-place vocabulary reassignment (IVR) of a pretrained causal LM: the workflow's wiring.
# Each rule lives in rules/<rule>.smk, included in pipeline order, and runs scripts/<rule>.py;
# tests/test_<rule>.py tests that script. rules/common.smk holds the helpers the rules share.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/fetch_assets.smk"
include: "rules/gguf_to_hf.smk"
include: "rules/ingest_corpus.smk"
include: "rules/analyze_corpus.smk"
include: "rules/distill_tokenizer.smk"
include: "rules/tokenizer_fidelity.smk"
include: "rules/select_candidates.smk"
include: "rules/remap_tokenizer.smk"
include: "rules/reorder_embeddings.smk"
include: "rules/init_model.smk"
include: "rules/pack_data.smk"
include: "rules/train_sft.smk"
include: "rules/validate.smk"
include: "rules/finalize_model.smk"
include: "rules/export_gguf.smk"


rule all:
    default_target: True
    input:
        "results/final_model",
