"""The metering server: usage events and quotas (MeteringService) and tenant onboarding,
plans and configuration (TenantService)."""
