"""Model components: Jet flow, factoring, GMM head, decoder, JetFormer."""
