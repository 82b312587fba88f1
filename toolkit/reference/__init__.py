"""The reference marketplace: the source schema and the synthetic data of the application the
shipped catalog describes, for the demo, the tests and the benchmarks. An application brings its
own tables and catalog; nothing else in toolkit/ names these tables."""
