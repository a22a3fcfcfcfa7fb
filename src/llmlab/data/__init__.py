"""What the model learns from: the synthetic world and its tasks, corpus sources, the tokenizer, the chat
template, SFT conversations and the preference pairs."""
