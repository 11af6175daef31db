# Stage 2b, how faithfully the distilled tokenizer reproduces the base BPE on the held-out splits.


rule tokenizer_fidelity:
    input:
        tokenizer="results/tokenizer/distilled",
        texts=heldout_texts(),
        reference=lambda wildcards: local_inputs(base_tokenizer()),
    output:
        "results/tokenizer/fidelity.json",
    log:
        "logs/tokenizer_fidelity.log",
    benchmark:
        "benchmarks/tokenizer_fidelity.tsv"
    conda:
        ENV
    params:
        script=script("tokenizer_fidelity.py"),
        reference=base_tokenizer(),
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --reference {params.reference:q} --candidate {input.tokenizer:q}"
        " --text {input.texts:q} --out {output:q} {params.trust} > {log:q} 2>&1"
