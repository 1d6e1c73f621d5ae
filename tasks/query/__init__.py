"""Query stage: read a queries file, embed and search LanceDB at a pinned version, build
prompts, generate, parse citations and boxes."""
