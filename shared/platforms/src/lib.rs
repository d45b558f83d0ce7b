//! The platforms the bridge talks to over HTTP: the Meta Conversions API and Google Ads (the
//! Ads API and the Data Manager API) as delivery `Platform`s, and the CRM API clients (HubSpot, Salesforce).

pub mod config;
pub mod credentials;
pub mod crm;
pub mod google;
pub mod http;
pub mod hubspot;
pub mod meta;
pub mod salesforce;
