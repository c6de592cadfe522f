// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title TraceFactory
/// @notice Devnet traffic that only call traces show: value moved by contracts (internal
///         calls) and contracts created by contracts (CREATE and CREATE2 inside a call).
/// @dev `split` pays each recipient from inside the call; `deploy` creates one TraceChild with
///      CREATE (funded with half the value) and one with CREATE2 (salted, funded with the
///      rest); `splitOrKeep` sends to each recipient through a call that reverts for the
///      last one and catches the revert, so the trace holds a value frame whose effect was
///      undone (a transfer that did not happen).
contract TraceFactory {
    event Created(address indexed child, bool salted);

    error PaymentFailed(address to);

    function split(address payable[] calldata recipients) external payable {
        uint256 each = msg.value / recipients.length;
        for (uint256 i = 0; i < recipients.length; i++) {
            (bool ok, ) = recipients[i].call{value: each}("");
            if (!ok) revert PaymentFailed(recipients[i]);
        }
    }

    function deploy(bytes32 salt) external payable returns (address plain, address salted) {
        uint256 half = msg.value / 2;
        plain = address(new TraceChild{value: half}());
        salted = address(new TraceChild{salt: salt, value: msg.value - half}());
        emit Created(plain, false);
        emit Created(salted, true);
    }

    function splitOrKeep(address payable[] calldata recipients) external payable {
        uint256 each = msg.value / recipients.length;
        for (uint256 i = 0; i < recipients.length; i++) {
            try this.pay{value: each}(recipients[i], i + 1 == recipients.length) {} catch {}
        }
    }

    /// Forwards its value to `to`, then reverts if asked: the payment is undone.
    function pay(address payable to, bool fail) external payable {
        (bool ok, ) = to.call{value: msg.value}("");
        if (!ok || fail) revert PaymentFailed(to);
    }
}

/// A contract created by TraceFactory; it can pass its balance on (one more internal call).
contract TraceChild {
    address public immutable creator;

    constructor() payable {
        creator = msg.sender;
    }

    receive() external payable {}

    function sweep(address payable to) external {
        (bool ok, ) = to.call{value: address(this).balance}("");
        require(ok);
    }
}
