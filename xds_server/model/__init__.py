"""The mesh model: the intermediate representation between sources and translators."""
