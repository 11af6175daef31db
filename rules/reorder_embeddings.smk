# Stage 4, the reordered embeddings: reassigned rows initialised from the new tokens' base segmentations.


rule reorder_embeddings:
    input:
        rules="results/remap/remap_rules.yaml",
        model=local_inputs(base_model()),
    output:
        embeddings="results/embeddings/reordered.safetensors",
        meta="results/embeddings/reordered.json",
    log:
        "logs/reorder_embeddings.log",
    benchmark:
        "benchmarks/reorder_embeddings.tsv"
    conda:
        ENV
    params:
        script=script("reorder_embeddings.py"),
        model=lambda wildcards: base_model(),
        opts=config["embeddings"],
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --base-model {params.model:q} --rules {input.rules:q}"
        " --strategy {params.opts[strategy]} --seed {params.opts[seed]}"
        " --weighted-ratio {params.opts[weighted_ratio]} --tied-weighted {params.opts[tied_weighted]}"
        " --random-scale {params.opts[random_scale]} {params.trust} --out {output.embeddings:q} --meta-out {output.meta:q} > {log:q} 2>&1"
