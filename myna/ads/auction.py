"""The auction: second price with quality (generalised second price for one slot) and a reserve price.

An eligible ad's score is what the impression is expected to be worth, weighted by how well the ad fits:

    eCPM  = bid                   for a "cpm" bid (per 1000 impressions)
          = bid * pCTR * 1000     for a "cpc" bid (per click; pCTR from the log, myna/ads/log.py)
    score = eCPM * relevance

The highest score wins and pays the least it could have bid and still won: the eCPM at which its score equals the
runner-up's, or RESERVE_CPM if that is more, in its own bid's unit (per 1000 impressions, or per click: the eCPM
divided by pCTR * 1000), and never more than its bid. An ad whose eCPM is under the reserve does not take part.

Why second price: for one slot it is Vickrey's auction, where bidding one's true value is the best strategy, so an
advertiser need not watch the others and shade its bid as first price invites, and the price says what the
impression was worth to the runner-up. Why with quality: the most relevant ad wins at an equal bid, and pays less
the more relevant it is, so advertisers are paid to be relevant rather than loud. Why a reserve: without one, a
lone eligible ad would win for nothing.
"""

# CURRENCY per 1000 impressions: the least an impression sells for, well under a feed ad's CPM
RESERVE_CPM = 0.50
PRICE_DECIMALS = 6  # millionths of the currency, as ad servers count


def expected_cpm(bid_type: str, bid: float, pctr: float) -> float:
    """What one thousand impressions of this bid are expected to pay."""
    return bid if bid_type == "cpm" else bid * pctr * 1000


def clearing_price(
    bid_type: str, bid: float, pctr: float, relevance: float, runner_up_score: float, reserve_cpm: float
) -> float:
    """The winner's price in its bid's unit: the least bid whose score still reaches the runner-up's
    (runner_up_score 0 when it ran alone) and whose eCPM reaches the reserve; at most its bid."""
    ecpm = max(runner_up_score / relevance, reserve_cpm)
    price = ecpm if bid_type == "cpm" else ecpm / (pctr * 1000)
    return min(round(price, PRICE_DECIMALS), bid)
