"""The embedded default world: an emoji catalogue, a scene renderer and the text the models learn from."""
