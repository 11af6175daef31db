# Stage 6a, the packed training data: the training split packed into blocks with each branch's tokenizer
# (ivr: the initialized model's remapped one; control: the base model's).


rule pack_data:
    input:
        unpack(pack_inputs),
    output:
        ids="results/data/{branch}/input_ids.bin",
        mask="results/data/{branch}/loss_mask.bin",
        meta="results/data/{branch}/meta.json",
    log:
        "logs/pack_data/{branch}.log",
    benchmark:
        "benchmarks/pack_data/{branch}.tsv"
    conda:
        ENV
    threads: config["training"]["threads"]
    params:
        script=script("pack_data.py"),
        tokenizer=lambda wildcards: branch_model(wildcards.branch),
        extra=pack_args,
        block_size=config["training"]["block_size"],
        seed=config["training"]["seed"],
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --tokenizer {params.tokenizer:q} --train {input.train:q} {params.extra}"
        " --block-size {params.block_size} --seed {params.seed} --threads {threads}"
        " {params.trust} --out-dir results/data/{wildcards.branch} > {log:q} 2>&1"
