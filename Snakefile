# In-place vocabulary reassignment (IVR) of a pretrained causal LM: the workflow's wiring.
# Stages live in rules/*.smk, in pipeline order; each calls one script in scripts/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/assets.smk"
include: "rules/corpus.smk"


rule all:
    default_target: True
    input:
        "results/analysis/corpus_stats.json",
