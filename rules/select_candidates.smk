# Stage 3a, the remap rules: which new tokens take which ids (remap_rules.yaml), or a user's rules file
# checked and completed.


rule select_candidates:
    input:
        unpack(select_inputs),
    output:
        candidates="results/remap/candidates.tsv",
        rules="results/remap/remap_rules.yaml",
        report="results/remap/selection_log.md",
    log:
        "logs/select_candidates.log",
    benchmark:
        "benchmarks/select_candidates.tsv"
    conda:
        ENV
    params:
        script=script("select_candidates.py"),
        tokenizer=base_tokenizer(),
        model=base_model(),
        opts=config["ivr"],
        choice=select_args,
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --tokenizer {params.tokenizer:q} --model {params.model:q}"
        " --pretokens {input.pretokens:q} --frequencies {input.frequencies:q}"
        " --backend {params.opts[backend]} --n-reassign {params.opts[n_reassign]}"
        " --min-count {params.opts[min_count]} --digits {params.opts[digits]}"
        " --max-sacrifice-domain-count {params.opts[max_sacrifice_domain_count]}"
        " {params.choice} {params.trust} --candidates-out {output.candidates:q}"
        " --rules-out {output.rules:q} --log-out {output.report:q} > {log:q} 2>&1"
