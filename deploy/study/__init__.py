"""Leave-one-site-out studies: federated, centralized and site-local models scored in and out of site."""
