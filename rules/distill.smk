# Stage 2, the distilled tokenizer: a Unigram model over the base vocabulary (same ids) whose scores are
# fitted to reproduce the base BPE's segmentation, and how faithfully it does so on the held-out splits.
# One rule makes both: Snakemake refuses a file that another rule writes inside a directory output.


rule distill_tokenizer:
    input:
        pretokens="results/analysis/pretokens.parquet",
        texts=heldout_texts(),
        tokenizer=lambda wildcards: local_inputs(base_tokenizer()),
    output:
        tokenizer=directory("results/tokenizer/distilled"),
        fidelity="results/tokenizer/distilled/fidelity.json",
    log:
        distill="logs/distill_tokenizer.log",
        fidelity="logs/tokenizer_fidelity.log",
    benchmark:
        "benchmarks/distill_tokenizer.tsv"
    conda:
        ENV
    params:
        script=script("distill_tokenizer.py"),
        fidelity_script=script("tokenizer_fidelity.py"),
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
        " --out {output.tokenizer:q} {params.general} --vocabulary-weight {params.opts[vocabulary_weight]}"
        " --margin {params.opts[margin]} --l2 {params.opts[l2]} --max-rounds {params.opts[max_rounds]}"
        " --patience {params.opts[patience]} --lbfgs-iterations {params.opts[lbfgs_iterations]}"
        " --dev-fraction {params.opts[dev_fraction]} --seed {params.opts[seed]} {params.trust}"
        " > {log.distill:q} 2>&1"
        " && python {params.fidelity_script:q} --reference {params.tokenizer:q} --candidate {output.tokenizer:q}"
        " --text {input.texts:q} --out {output.fidelity:q} {params.trust} > {log.fidelity:q} 2>&1"
