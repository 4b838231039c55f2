"""Exact structured-sparsity methods: each registers a Pattern under the same options."""
