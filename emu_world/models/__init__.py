"""The models: vision tokenizer (IBQ), text tokenizer, token layout, world model (Qwen3-shaped decoder),
token-by-token generation, DiDA parallel decoding, and the reader of world-model exports.

Models import nothing from training, benchmarks or the command-line tools."""
