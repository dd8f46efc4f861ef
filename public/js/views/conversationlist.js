/* The conversation list: the lobby and the member rooms, then the private
 * conversations (most recent first), each with its unread count. */
(function (ChatApp, Backbone, _) {
  'use strict';

  ChatApp.views.ConversationListView = Backbone.View.extend({
    template: ChatApp.template('conversation-item-template'),

    events: {
      'click [data-action="select"]': 'select',
      'keydown [data-action="select"]': 'key',
      'click [data-action="browse"]': 'browse'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.conversations = this.model.conversations;
      this.listenTo(this.conversations, 'update reset change:unread change:peerOnline change:name change:activity', this.render);
      this.listenTo(this.model, 'change', function () {
        if (this.model.hasChanged('active') || this.model.hasChanged('directory')) {
          this.render();
        }
      });
    },

    render: function () {
      var conversations = this.conversations;
      var rooms = conversations.filter(function (c) { return c.get('kind') === 'room'; });
      rooms = _.sortBy(rooms, function (c) { return c.get('name').toLowerCase(); });
      var privates = _.sortBy(conversations.where({ kind: 'private' }), function (c) { return -c.get('activity'); });
      this.$('#roomConvs').empty().append(_.map([this.model.lobby].concat(rooms), this.item, this));
      this.$('#privateConvs').empty().append(_.map(privates, this.item, this));
      this.$('#privateHint').toggleClass('d-none', privates.length > 0);
      this.$('#browseRooms').toggleClass('active', !!this.model.get('directory'));
      return this;
    },

    item: function (conversation) {
      var active = !this.model.get('directory') && this.model.get('active') === conversation.id;
      var unread = conversation.get('unread');
      var li = document.createElement('li');
      li.className = 'list-group-item list-group-item-action conv-item conv-' + conversation.get('kind') + (active ? ' active' : '');
      li.dataset.key = conversation.id;
      li.dataset.action = 'select';
      li.setAttribute('role', 'button');
      li.tabIndex = 0;
      if (active) {
        li.setAttribute('aria-current', 'true');
      }
      li.innerHTML = this.template({
        kind: conversation.get('kind'),
        label: conversation.isLobby() ? 'Lobby' : conversation.get('name'),
        peerOnline: conversation.get('peerOnline'),
        unread: unread,
        unreadText: unread > 99 ? '99+' : String(unread)
      });
      return li;
    },

    select: function (event) {
      this.vent.trigger('select', event.currentTarget.dataset.key);
    },

    // The entries are list items acting as buttons: Enter and Space too.
    key: function (event) {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        this.select(event);
      }
    },

    browse: function () {
      this.vent.trigger('browseRooms');
    }
  });
})(ChatApp, Backbone, _);
