"""Export a trained run as a Hugging Face model folder, with a model card.

export_run (writer.py): checkpoint + report of a workdir -> config, safetensors weights, tokenizer, README.md
to_gpt2, gpt2_config, byte_tokenizer (gpt2.py): our GPT as transformers' GPT2LMHeadModel; bytes as a tokenizer
write_hf_model (hf.py): a family "hf" run's transformers model and tokenizer, as they trained
RunSummary, summarize_run, model_card (card.py): what the workdir knows of the run, as a model card
"""
