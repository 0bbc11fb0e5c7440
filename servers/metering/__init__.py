"""The metering server: usage events and quotas (MeteringService, usage/), tenant onboarding,
plans and configuration (TenantService, tenants/), the audit trail (AuditService, audit/)."""
