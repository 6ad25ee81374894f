"""Export to Hugging Face: ``export(ckpt, out)`` writes a folder that
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads (see hf_export);
``export(ckpt, out, format="w8aspike", w8a=...)`` one with int8 weights and spike activations."""

from sbtrain.export.hf_export import ExportError, export, hf_config, load_source, resolve_source

__all__ = ["ExportError", "export", "hf_config", "load_source", "resolve_source"]
