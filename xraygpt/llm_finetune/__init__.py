"""Text-only conversation fine-tuning of the LLM (full or LoRA), before it is frozen inside XrayGPT.

The paper's chain: a Vicuna-family model fine-tuned on medical doctor-patient conversations (MedVicuna), then
on radiology conversations (RadVicuna). The output of each step is a plain Hugging Face folder, so the vision
recipe loads it like any LLM (`model.llm.name_or_path=<folder>`), with the same conversation template.
"""
