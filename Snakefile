# In-place vocabulary reassignment (IVR) of a pretrained causal LM: the workflow's wiring.
# Stages live in rules/*.smk, in pipeline order; each calls one script in scripts/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/assets.smk"
include: "rules/corpus.smk"
include: "rules/distill.smk"
include: "rules/embeddings.smk"
include: "rules/train.smk"
include: "rules/remap.smk"
include: "rules/validate.smk"


rule all:
    default_target: True
    input:
        "results/final_model",
