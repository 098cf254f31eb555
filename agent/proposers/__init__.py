"""Proposers: each a small class behind `agent.proposal.Proposer`, returning the same `Proposal`.

Import them from their modules (`agent.proposers.llm.LLMProposer`), so that using one proposer never
imports another's dependencies.
"""
