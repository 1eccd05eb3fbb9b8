"""Looking inside a trained JetFormer: per-patch likelihood maps, latent manipulations (paper
App. D, Fig. 6), image completion from kept latent rows, and the text -> image -> text round
trip. Library code only; the CLI commands and the `inspect` DVC stage call these modules."""
