# Stage 2a, the distilled tokenizer: a Unigram model over the base vocabulary (same ids) whose scores
# are fitted to reproduce the base BPE's segmentation.


rule distill_tokenizer:
    input:
        pretokens="results/analysis/pretokens.parquet",
        tokenizer=lambda wildcards: local_inputs(base_tokenizer()),
    output:
        directory("results/tokenizer/distilled"),
    log:
        "logs/distill_tokenizer.log",
    benchmark:
        "benchmarks/distill_tokenizer.tsv"
    conda:
        ENV
    params:
        script=script("distill_tokenizer.py"),
        tokenizer=base_tokenizer(),
        opts=config["distill"],
        general=(
            "--include-general"
            if config["distill"]["include_general"]
            else "--no-include-general"
        ),
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --tokenizer {params.tokenizer:q} --pretokens {input.pretokens:q}"
        " --out {output:q} {params.general} --vocabulary-weight {params.opts[vocabulary_weight]}"
        " --margin {params.opts[margin]} --l2 {params.opts[l2]} --max-rounds {params.opts[max_rounds]}"
        " --patience {params.opts[patience]} --lbfgs-iterations {params.opts[lbfgs_iterations]}"
        " --dev-fraction {params.opts[dev_fraction]} --seed {params.opts[seed]} {params.trust}"
        " > {log:q} 2>&1"
