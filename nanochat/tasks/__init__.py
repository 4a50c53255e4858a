"""Conversation tasks for midtraining, SFT and chat evaluation.

base.py      Task / TaskMixture, multiple-choice rendering, answer checking
offline.py   chatterbot dialogues and generated tasks (arithmetic, spelling, multiple choice, identity)
hub.py       SmolTalk, MMLU, ARC, GSM8K through the `datasets` library
mixtures.py  the per-stage mixtures, the --data offline|hub|auto choice, chat_eval task names
evaluate.py  categorical (logits) and generative (sampled) evaluation loops
"""
