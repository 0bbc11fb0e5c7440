"""Tenants: their domain and plans, the stores that keep them, onboarding hooks and TenantService."""
